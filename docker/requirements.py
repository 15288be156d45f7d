"""Print the app's ``[project]`` dependencies from ./pyproject.toml, one per line, for an image.

``--torch``: only torch and torchvision (installed from PyTorch's CPU wheel index); otherwise every
other dependency except flwr itself, which Flower's base images already hold.
"""

import sys
import tomllib

from packaging.requirements import Requirement  # a dependency of flwr

TORCH = {"torch", "torchvision"}

with open("pyproject.toml", "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
torch_only = sys.argv[1:] == ["--torch"]
for line in dependencies:
    name = Requirement(line).name.lower()
    if name != "flwr" and (name in TORCH) == torch_only:
        print(line)
