"""The image: base root filesystem, boot files, partitions and file systems, block map, SBOM; the one build pipeline."""
