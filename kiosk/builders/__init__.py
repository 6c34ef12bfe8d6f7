"""Remote builders: choosing one, ssh, the wire format, the builder's server, the device's key."""
