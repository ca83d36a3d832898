"""The ``csi-rbd`` administration commands (an ``rbd``-like tool for the native engine).

Each command module registers its subcommands with :func:`.command.add_command`
and implements them as ``handler(ctx, args)`` functions; :mod:`csi_rbd.cli`
builds the parser from these modules and maps errors to exit codes.
"""
