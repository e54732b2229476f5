"""The offline tier on LTO tape: drives (drive.py), libraries and labels (library.py), the archive stream over a
drive (stream.py), the BlobBackend (backend.py) and cartridge verification (verify.py). docs/tiering.md "Tape tier"."""
