"""mDNS: the device agent that announces <host>.local, and discovery/resolution on the laptop."""
