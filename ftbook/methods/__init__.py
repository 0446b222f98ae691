"""Method libraries a reader would reuse outside the book: PEFT methods, model merging, muP, curvature (the Hessian's
top eigenvalue), weight-space analysis, logit arithmetic (decoding from several models at once: EFT, proxy tuning),
the kernel view (the linearized model, the empirical NTK) and data selection (importance weights, distribution
shifting, skill mixtures). A method imports only the core package (``ftbook.*``), never a lab."""
