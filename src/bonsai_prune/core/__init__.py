"""Pure math of the search, tested without a model: priors, sampling, regression,
selection, the parameter budget, the text metrics of U† and its weights."""
