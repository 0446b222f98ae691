"""Method libraries a reader would reuse outside the book: PEFT methods, model merging, muP, curvature (the Hessian's
top eigenvalue), weight-space analysis and logit arithmetic (decoding from several models at once: EFT,
proxy tuning). A method imports only the core package (``ftbook.*``), never a lab."""
