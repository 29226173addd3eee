"""Reports of runs and sweeps (tables, figures, one offline HTML page) and a run's TensorBoard events.

    fedjax-llm-report DIR [DIR ...]       # see fedjax_llm/report/cli.py

load.py reads run directories, group.py pools seeds per setting, tables.py / plots.py / page.py
write them, cli.py ties it together; tensorboard.py is the writer train.py calls every round.
"""
