"""On-disk formats: checkpoint directories, mask files and manifests. Every stage reads and writes through here."""
