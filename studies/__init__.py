"""What trains and evaluates the models: data, the one training loop, the papers' experiments
(``attnbench reproduce``) and the matching task (``attnbench match``).

Studies use ``attnbench.models`` for the networks and measure cost only through
``attnbench.bench``'s public measurement function; they write to the same results
store as the sweeps, under the same run discipline (``attnbench.bench.rundir``).
"""
