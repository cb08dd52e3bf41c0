"""The named ResNeXt architectures, the one list that engine.models builds and
engine.config checks model names against. Free of torch, so the config stays cheap to
import and needs nothing from the models."""

# name -> (blocks per stage, cardinality, base width)
ARCHITECTURES = {
    "resnext50_32x4d": ([3, 4, 6, 3], 32, 4),
    "resnext101_32x4d": ([3, 4, 23, 3], 32, 4),
    "resnext101_32x8d": ([3, 4, 23, 3], 32, 8),
    "resnext101_32x16d": ([3, 4, 23, 3], 32, 16),
    "resnext101_32x32d": ([3, 4, 23, 3], 32, 32),
    "resnext101_32x48d": ([3, 4, 23, 3], 32, 48),
}
