"""Serialization shared by every layer: tensors inside msgpack values, and tensor compression."""
