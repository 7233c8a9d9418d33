"""The paper's figures and plots of every result, drawn with matplotlib without a display:

    correlation  |C_teacher - C_student| of the class-logit correlation matrices (Figure 1)
    sweep        top-1 (mean +- std over seeds) against one loss weight (Figure 2)
    curves       a run's log.csv: train loss per term, test top-1, learning rate
    tables       the results' tables as Markdown and grouped bar charts

Every figure is written with a sidecar JSON of the values it plots (output.save_figure).
"""
