"""What the oneDNN tests share: the convolution layout, the platform check, and reading the
result types of custom calls out of StableHLO text."""

from __future__ import annotations

import os

NHWC = ("NHWC", "HWIO", "NHWC")
IS_LINUX_X86 = os.uname().sysname == "Linux" and os.uname().machine == "x86_64"


def first_results(hlo: str, target: str) -> list[str]:
    """The first result type of each ``target`` custom call in StableHLO text, as in
    "... -> (tensor<2x16x16x32xbf16>, tensor<...xui8>)" or "... -> tensor<...xbf16>"."""
    calls = [line for line in hlo.splitlines() if "custom_call" in line and target in line]
    return [line.split("->")[-1].split(",")[0].strip(" ()") for line in calls]
