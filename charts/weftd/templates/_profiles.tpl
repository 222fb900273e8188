{{/* Istio's profiles, as values laid over the chart's defaults. */}}
{{- define "weftd.profile.default" -}}
{}
{{- end }}

{{- define "weftd.profile.demo" -}}
meshConfig:
  accessLogFile: /dev/stdout
pilot:
  autoscaleEnabled: false
  resources:
    requests:
      cpu: 10m
      memory: 100Mi
global:
  proxy:
    resources:
      requests:
        cpu: 10m
        memory: 40Mi
{{- end }}

{{- define "weftd.profile.minimal" -}}
{}
{{- end }}

{{- define "weftd.profile.empty" -}}
{}
{{- end }}
