"""The single-machine launcher: runs every Tidepool service on embedded defaults (`make up`)."""
