"""`python -m wudao.cli`: how `stages.run_train_torchrun` starts each torchrun rank of `wudao train`. Only the
library's commands; the console script `wudao` is `flows.cli:app`."""

from wudao.cli import app

if __name__ == "__main__":
    app()
