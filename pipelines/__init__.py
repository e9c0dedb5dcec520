"""The nasforge Kubeflow pipeline: definition, compilation and the local (kfp.local) driver."""
