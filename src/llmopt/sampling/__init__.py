from llmopt.sampling.params import SamplingParams
from llmopt.sampling.sampler import SamplingTensors, sample

__all__ = ["SamplingParams", "SamplingTensors", "sample"]
