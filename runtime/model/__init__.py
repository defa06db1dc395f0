"""Model folders: the manifest, the file layouts sdrt reads, family recognition, precision variants,
the folder check and the vetting of graph files before a backend opens them."""
