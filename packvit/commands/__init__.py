"""The subcommands of the ``packvit`` command line: each module has ``add_parser(subparsers)`` and ``run(args)``.

The work is done by plain functions (``weights_conversion.convert_checkpoint``, ``export_hf``,
``load_model``); these modules only parse arguments and print.
"""
