"""`kiosk run`: boot an image in QEMU the way its board would."""
