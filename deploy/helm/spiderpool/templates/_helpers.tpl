{{- define "spiderpool.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "spiderpool.labels" -}}
app.kubernetes.io/part-of: spiderpool
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "spiderpool.webhookClient" -}}
{{- if .Values.spiderpoolController.webhookURL -}}
url: {{ trimSuffix "/" .Values.spiderpoolController.webhookURL }}{{ .path }}
{{- else -}}
service:
  name: {{ .Values.spiderpoolController.name }}
  namespace: {{ .Release.Namespace }}
  port: {{ .Values.spiderpoolController.webhookPort }}
  path: {{ .path }}
{{- end -}}
{{- end -}}

{{- /* global.ipamUNIXSocketHostPath as a directory (this chart's form) or as the socket file
upstream's chart gives (…/spiderpool.sock): both work. */ -}}
{{- define "spiderpool.socketDir" -}}
{{- $p := trimSuffix "/" .Values.global.ipamUNIXSocketHostPath -}}
{{- if hasSuffix ".sock" $p -}}{{ dir $p }}{{- else -}}{{ $p }}{{- end -}}
{{- end -}}

{{- define "spiderpool.socketPath" -}}
{{- $p := trimSuffix "/" .Values.global.ipamUNIXSocketHostPath -}}
{{- if hasSuffix ".sock" $p -}}{{ $p }}{{- else -}}{{ $p }}/spiderpool.sock{{- end -}}
{{- end -}}
