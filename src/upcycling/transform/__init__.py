"""Second-stage transforms: the dense D1 model -> the initial model of each second-stage method."""
