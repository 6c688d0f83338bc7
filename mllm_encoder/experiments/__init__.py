"""The experiments run on the DMU method: the CPU demo, the stage-level control worlds, their evaluator and report.

An application on the library and on :mod:`mllm_encoder.dmu` (which imports nothing from here): the synthetic
worlds (``synthetic_world``, ``marker_world``), the one evaluator that scores them (``evaluator``), the demo
(``demo``), the control runs (``control_world``) and the numbers and words of the report (``report``).
"""
