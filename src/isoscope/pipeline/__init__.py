"""Between receivers and exporters: hold each batch until its kernel data is drained, join, enrich, fan out."""
