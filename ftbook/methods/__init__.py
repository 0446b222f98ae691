"""Method libraries a reader would reuse outside the book: PEFT methods, model merging, muP, curvature (the Hessian's
top eigenvalue) and weight-space analysis. A method imports only the core package (``ftbook.*``), never a lab."""
