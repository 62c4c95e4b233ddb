"""The base every layer imports: errors that name the file, the field and the fix; the one registry shape; markdown
escaping for text a dataset controls. It imports nothing of the project (below catalog, model, stages, pipelines and
infra alike)."""
