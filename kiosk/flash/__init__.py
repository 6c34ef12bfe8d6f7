"""Writing an image to an SD card safely: target checks, the writer with read-back, progress."""
