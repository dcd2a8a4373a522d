"""Thyme SFT data: conversion of the released datasets, execution filtering, loss masks.

- :mod:`thyme.data.convert` (``thyme data convert``): released datasets -> local JSONL + images;
- :mod:`thyme.data.verify` (``thyme data verify``): the paper's sandbox execution filtering;
- :mod:`thyme.data.masks` (``thyme data show-masks``): token-level loss masks from character spans;
- :mod:`thyme.data.annotate` (``thyme data annotate``): RL questions with target boxes annotated
  in Label Studio, checked and cross-checked, written as RL records (paper Sec. 4.1, App. A);
- :mod:`thyme.data.records`: the SFT record structure (inputs, recorded outputs, output spans).

Floor 4 (beside evaluate and train): uses the agent (replay) and the backends' processors;
must not import evaluate, train, report or cli.
"""
