"""KServe model server for the brain-MRI tumour classifier.

``python -m serving --model_name NAME --storage_uri s3://bucket/prefix`` loads a model bundle
(see :mod:`brainmri.model`) and answers the KServe v1 and v2 inference protocols; the predictor
itself is :class:`serving.predictor.BrainMRIModel`.
"""
