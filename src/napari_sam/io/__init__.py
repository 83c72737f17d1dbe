"""Reading and writing medical image files (NIfTI) with their geometry intact."""
