"""What ties the stages to Snakemake, DVC and Slurm (the stages themselves do not import it).

inputs.py   the rules' input functions: the files a rule reads that the config names
slurm.py    each rule's Slurm resources, from the config (profiles/slurm)
dvcyaml.py  dvc.yaml rendered from the rules (`ftflow dvc-yaml`), and its drift check
sync.py     after `dvc checkout` / `dvc exp apply`: make Snakemake agree (`ftflow sync`)
"""
