"""moekit's applications: the `moe` console script (cli), `moe demo` (demo, data), its charts
(plots) and `moe plan` (planner). They import the library like a user would; the library never
imports them. Their extra packages (tqdm, matplotlib) come with ``pip install "moekit[apps]"``.
"""
