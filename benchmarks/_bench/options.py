"""Command-line options the benchmark scripts declare alike."""


def add_int_options(parser, **defaults):
    """One ``--name N`` integer option per keyword (``state_mib`` -> ``--state-mib``), in the
    order given, which is the order --help lists them in."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
