"""Deployed parties: the aggregator and each cloud as its own process (serve.py), a local launcher (launch.py), and the keys CLI (keys.py)."""


def serve_main() -> None:
    """The fedjax-llm-serve console script: signals are handled before the heavy imports start."""
    from fedjax_llm.startup import prefer_huge_pages

    prefer_huge_pages()
    from fedjax_llm.lifecycle import exit_on_signals_while_starting

    exit_on_signals_while_starting("fedjax-llm-serve")
    from fedjax_llm.deploy.serve import main

    main()
