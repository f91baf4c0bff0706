"""Metrics in the server: the engines' series over time (REST, from the control plane's collector)
and sage_nb's own metrics for the lab's Prometheus (:mod:`.exporter`)."""
