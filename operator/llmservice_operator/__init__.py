"""The LLMService operator: reconciles LLMService resources into model-serving workloads."""
