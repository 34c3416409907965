"""Experiments on the lab kit: the paper's Figure 2 (``fig2``) and the migration overhead
(``overhead``), with their pure parts (``poisson``: seeded arrivals and scaling; ``epochs``:
fixed-length alternating epochs from a real hash chain; ``report``: results files and plots)
kept apart from the parts that run programs. See docs/results.md.
"""
