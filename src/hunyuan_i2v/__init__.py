"""hunyuan-i2v: a from-scratch, weight-compatible HunyuanVideo-I2V implementation."""

__version__ = "0.1.0"
