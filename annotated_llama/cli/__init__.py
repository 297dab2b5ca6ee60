"""One module per `annotated-llama` command: `add_arguments(parser)` and `run(args)`."""
