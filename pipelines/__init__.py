"""The Kubeflow pipeline (DAG), its compiler and the command line that runs it."""
