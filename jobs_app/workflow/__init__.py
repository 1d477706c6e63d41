"""What runs on the workflow's side: the signed callback client."""
