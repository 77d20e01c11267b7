"""The CUSTOM attention backend and the FlashAttention calls it makes."""
