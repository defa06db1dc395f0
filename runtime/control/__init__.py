"""ControlNet at run time (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"): control folders, units, preprocessors and the residuals the UNet adds."""
