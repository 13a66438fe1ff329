"""Record schema, readers and writers shared by the stages."""
