"""Print the app's ``[project]`` dependencies from ./pyproject.toml, one per line, for an image.

No flag: every dependency except flwr, torch and torchvision. ``--torch``: only torch and
torchvision (installed first, as CPU wheels). ``--flwr``: only flwr's pin, without its extras
(``[simulation]``'s Ray is for simulation only). Needs nothing but Python 3.11's standard library,
so that it runs on any base image before anything is installed.
"""

import re
import sys
import tomllib

TORCH = {"torch", "torchvision"}


def name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


with open("pyproject.toml", "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
flag = sys.argv[1] if sys.argv[1:] else ""
for line in dependencies:
    if flag == "--flwr":
        if name(line) == "flwr":
            print(re.sub(r"\[[^]]*\]", "", line))
    elif name(line) != "flwr" and (name(line) in TORCH) == (flag == "--torch"):
        print(line)
