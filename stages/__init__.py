"""The pipeline stages (extract, select, align, evaluate) and the small pure pieces they share."""
