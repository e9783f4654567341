"""``ssr report``: an HTML page and a PNG contact sheet of seeds/refine/predict runs.

``render`` draws pictures (numpy + PIL), ``html`` writes the pages; the stage itself is
``ssr_cli.stages.report.build_report``.
"""
