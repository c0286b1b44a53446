"""The GPU side: resident models and attention capture (models/), the segmentation methods
(methods/), the job engine that runs them from the queue (engine/), and evaluation protocols
(evaluation/)."""
