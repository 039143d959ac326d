"""`python -m adtr_deploy.train ...` is `adtr-train ...`; torchrun launches it: `torchrun --nproc-per-node N -m adtr_deploy.train`."""

from adtr_deploy.cli.train import command

if __name__ == "__main__":
    command(prog_name="adtr-train")
