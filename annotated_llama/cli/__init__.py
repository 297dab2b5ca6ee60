"""One module per `annotated-llama` command: `add_arguments(parser)` and `run(args)`.

`__main__` imports only the chosen command's module, and each module imports torch and the
package's heavier layers inside `run` (the standard library at its top): `annotated-llama CMD --help`
answers in a fraction of a second, and one command's dependencies never slow another.
"""
