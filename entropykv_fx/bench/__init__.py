"""Quality benchmark of entropykv_fx (`entropykv-fx bench quality`): case generators, scorers and the harness."""
