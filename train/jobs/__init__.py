"""One module per job (`job=` in the config): train, eval, mine, merge. Each is a short function
over objects built by train/build.py and its own config block; train/run.py dispatches."""
